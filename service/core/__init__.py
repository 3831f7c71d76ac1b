"""What every feature builds on, and knows no feature: errors, the endpoint table and bodies,
the caller's address, the Redis connection and its keyspace, leases, the pub/sub hub with the
versioned copy, the secret box and the upstream control client."""

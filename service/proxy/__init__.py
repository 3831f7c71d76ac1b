"""The OpenAI-compatible proxy routes and the API-key gate in front of them."""

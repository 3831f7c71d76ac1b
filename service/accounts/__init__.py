"""ChatGPT accounts: auth.json import, tokens at rest and their refresh, usage windows."""

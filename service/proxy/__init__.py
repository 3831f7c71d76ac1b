"""The OpenAI-compatible proxy: the API-key gate, the balancer and the routes behind them."""

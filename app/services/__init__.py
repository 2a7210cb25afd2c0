"""Services own transactions: each takes the session first and keyword-only arguments,
commits on success and raises ``app.errors`` domain errors. None imports fastapi."""

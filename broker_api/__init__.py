"""The broker's web API: accounts, tokens, availability and pool requests (Falcon)."""

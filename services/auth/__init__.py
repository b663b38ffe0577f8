"""Auth service: users, roles, password hashes, JWT access and refresh tokens, API keys, JWKS."""

"""Pure functions from wire schemas (``protocol``) to ``core`` requests, and from core results back."""

"""API surfaces: one router module per public API. Handlers validate → translate → dispatch → render."""

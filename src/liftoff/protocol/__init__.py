"""Wire schemas per surface: pydantic models only, no I/O, no imports from the rest of Liftoff."""

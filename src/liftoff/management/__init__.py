"""Reader management: the registry of readers and their states, the heartbeat sweep, the process supervisor,
and the orchestration behind the management API (create, delete, write back to the manifest).
"""

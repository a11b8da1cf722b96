"""``morag-remote-worker``: polls a morag-remote server and runs a handler per job (see
``python -m morag_remote.worker --help`` and the README's "Running workers"). Like the client, it
imports nothing of the server (no Flask, marshmallow or psycopg)."""

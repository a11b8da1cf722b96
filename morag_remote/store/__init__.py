"""Storage: the interfaces (``base.py``), the backends (``files/``, ``postgres/``) and the factory that picks one."""

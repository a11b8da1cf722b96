"""gunicorn settings of the HTTP floor (:mod:`.floor`): the service's CPU placement of its workers;
worker class, processes and threads come from the command line, as gunicorn.conf.py sets them."""
from morag_remote.cpu_placement import post_fork, pre_fork  # noqa: F401 (gunicorn hooks)

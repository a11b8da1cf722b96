"""gunicorn settings for morag-remote: ``gunicorn -c gunicorn.conf.py wsgi:app``.

Worker class: ``gthread``. Long polls hold a request open for up to POLL_MAX_WAIT_SECONDS while
doing nothing, and downloads stream for as long as the network takes; a thread per request is cheap
for both (a waiting thread sleeps on a condition variable), while sync workers would let a handful of
long polls starve the API. Each process runs THREADS threads; the service lets at most
POLL_MAX_WAITERS of them wait in long polls, so short requests always find a thread.
"""
import os

bind = f"{os.environ.get('HOST', '127.0.0.1')}:{os.environ.get('PORT', '8000')}"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_class = "gthread"
threads = int(os.environ.get("GUNICORN_THREADS", "64"))
timeout = 60            # a worker process silent this long is restarted (gthread pings from its loop)
graceful_timeout = 30   # on SIGTERM, requests in flight (long polls end within 20 s) may finish
keepalive = 5
max_requests = 0
accesslog = None        # the app logs one structured line per request (morag_remote.log)
errorlog = "-"

"""Carrier and browser media transports: wire protocol in, session events out."""

#: The close code the ASGI server (uvicorn) gives every socket when it shuts down: the
#: call is not over, it resumes on another server (the session is handed over).
SERVER_RESTARTING = 1012

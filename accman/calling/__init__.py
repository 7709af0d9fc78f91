"""The calling side: what a service that charges per request runs.  It
imports neither the ledger nor the server (nor plyvel, nor uvloop)."""

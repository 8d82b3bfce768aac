"""Llumnix Backend: the HTTP front end and the `llumnix-serve` command."""

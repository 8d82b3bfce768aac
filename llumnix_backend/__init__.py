"""Llumnix Backend core: repository, configuration, Llumnix scheduling policies, plugin API."""

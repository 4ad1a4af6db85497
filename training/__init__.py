"""Offline training: TCM-regularised embedders on open-world data, evaluated and exported.

Produces artefacts (``tcm.artefact``) that the service loads; never imports ``service``.
"""

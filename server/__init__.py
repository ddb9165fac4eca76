"""The gRPC front end: ``app`` (process, settings, health), ``service`` (the servicer),
``validation``, ``feature_store`` and ``redis_store`` (the stores), ``pathway_builder``,
``catalog`` (SIDs to items), ``triton_client``, ``metrics``, and ``triton_launcher`` with
``triton_supervisor`` (a local Triton). It imports ``onerec.runtime``, never torch or the
offline package.
"""

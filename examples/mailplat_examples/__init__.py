"""Example third-party backends for mailplat: an SQLite user table, delivery
through an external command, and a sender blocklist filter.

Each module has a ``build(options, context)`` named by the drop-in file
``twisted/plugins/mailplat_examples.py``.
"""

"""The ground floor both sides import: the step contract (``step``), the worker interface
(``worker``) and the start-up steps a worker is handed (``startup``). Plain data and protocols over
numpy: no torch, and nothing from ``tandem.engine``, ``tandem.worker`` or ``tandem.parallel``
(``tests/test_layout.py``)."""

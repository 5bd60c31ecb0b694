"""Generated stubs of the Open Inference Protocol (KServe v2), package ``inference``.

Do not import them in a process that also imports tritonclient: both define the ``inference``
messages in protobuf's default descriptor pool (duplicate symbol). The server does not import
them; it builds its messages from ``open_inference.binpb`` in a pool of its own.
"""

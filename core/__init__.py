"""The tools every package of the suite uses, and which depend on none of them.

``core.files`` writes files atomically (a reader, or a rerun after a kill, sees the old file or the
new one, never half of one), reads state dicts with errors that say which file to fix and how,
locks files across processes and hashes them. ``core.loop`` is the one resumable training loop
that the base-model pretraining, method training, the judge, the in-domain extractors and
LIIF-3D share: an interrupted run resumes from its checkpoint and ends with the same weights as
an uninterrupted one. Nothing here imports ``benchmark``, ``methods``, ``metrics`` or
``datasets``; they import from here.
"""

"""Serving: what happens to a trained adapter after a run.

``export`` (a run's checkpoint -> merged model + PEFT adapter + manifest), ``modelcard`` (the card
with the privacy statement), ``registry`` (versions, promote, rollback, verify), ``inference``
(a ``Classifier`` over an export and file/stdin I/O) and ``drift`` (accuracy on fresh labelled data
against the export's figures).
"""

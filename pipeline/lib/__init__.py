"""What the stages share, one module per concern; nothing here reads ``params.yaml`` sections
of its own or imports a stage.

Data: ``records`` (RecordIO + meta.json), ``images`` (decoding, square fitting), ``data``
(batch loading), ``augment`` (the one affine parameterization of training and TTA), ``tta``
(views, batched forward passes, averaging). Models: ``checkpoint`` (self-describing,
resumable), ``sgd`` (the training step), ``quantize`` (INT8). Results: ``predictions``
(prediction files), ``metrics`` (Kaggle's log loss), ``submission`` (reading and checking
submission files), ``results`` and ``figures`` (tables and plots of a run, for the report and
the notebooks), ``notebook``. Plumbing: ``runs`` (artifact names), ``names`` (duplicates and
mismatches), ``params`` (strict sections), ``errors`` (one-line stage errors), ``fsutil``
(atomic writes), ``runtime`` (threads, CPU features, AMX, what ``auto`` precision means).
"""

"""Experiments on the synthetic world: the drivers that make data, evaluate, report, pretrain and simulate.

The world itself (``diffpref.world``: renderer, captions, detector, users, ceiling, metrics) is the
oracle and imports nothing from here; these modules drive models against it.

- ``make_data``        ``world make-data``: base-model pairs labelled by simulated users.
- ``relabel``          ``world relabel``: a make-data pool's pairs rated by other users.
- ``policy_pairs``     ``world policy-pairs``: a PPD adapter's own images rated by each training user.
- ``adherence``        ``world eval`` without an adapter: prompt adherence on balanced captions.
- ``preference_eval``  ``world eval --adapter``: oracle win rate of a tuned model; ``TrainingEvaluator``.
- ``ppd_eval``         ``world eval`` with a PPD adapter: few-shot personalization of unseen users.
- ``interpolation``    mixing two users' embeddings (``python -m diffpref.experiments.interpolation``).
- ``simulate``         simulated raters against the rating app (``python -m diffpref.experiments.simulate``).
- ``pretrain``         the recipe that builds the embedded world model (``train/pretrain_world.py``).
- ``report``           ``world report``: the markdown report of ``bench/world_experiments.sh``.
"""

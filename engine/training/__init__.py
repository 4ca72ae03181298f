"""Training: pre-training on generated scenes (:mod:`.pretrain`, :mod:`.synthetic`) and
retraining between rounds on a store's masks through Ray Train (:mod:`.retrain`)."""

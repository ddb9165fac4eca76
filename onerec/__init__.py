"""OneRec, offline: everything that turns an event log into a served model.

* ``onerec.data`` -- the event-log schema, the synthetic platform, MovieLens/KuaiRand loaders;
* ``embeddings``, ``tokenizer``, ``semantic_ids`` -- item vectors and RQ-KMeans semantic IDs;
* ``model`` -- the encoder-decoder (torch); ``train``, ``train_config``, ``evaluate``,
  ``experiment``, ``metrics``, ``baselines`` -- training and the offline evaluation;
* ``export``, ``repository``, ``feature_load`` -- ONNX export, filling the Triton model
  repository, and the feature store's initial contents;
* ``cli`` -- the ``onerec`` command, with ``cli.build`` the build pipeline;
* ``runtime`` -- what the request path runs (numpy, ONNX Runtime and faiss only). The
  offline code imports it; it never imports the offline code.
"""

__version__ = "0.1.0"

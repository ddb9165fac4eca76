"""What the request path runs: the front end (``server/``) and the Triton models import
only this package, which needs numpy, ONNX Runtime and faiss, never torch. The offline
code (``onerec``) imports it; it never imports the offline code. A test holds both lines.

* ``config`` -- :class:`OneRecConfig`, the model's sizes, and the FLOP count MFU uses;
* ``engagement`` -- the engagement score that defines positive feedback;
* ``pathways``, ``lifelong`` -- events to the four encoder pathways, lifelong compression;
* ``trie``, ``beam_search`` -- the catalog's SID trie and the constrained beam search;
* ``batching`` -- what the Triton models do with a dynamic batch;
* ``onnx_runners`` -- the exported encoder and decoder steps under ONNX Runtime;
* ``catalog``, ``sid_index`` -- the versioned served catalog, and SID to items;
* ``ranking`` -- the final ranking of decoded items;
* ``model_items`` -- the model's items, as the front end reads them;
* ``layout`` -- where the model repository keeps each model and file.
"""

"""Stage 3: backbone and head rebuilt from a run directory, checked, fine-tuned, exported, used.

* :mod:`.finetune`: ``finetune`` -- the stage in order, and how each step works;
* :mod:`.options`: ``FinetuneOptions``, the command's options declared once;
* :mod:`.predict`: ``evaluate`` and ``predict`` on images with a run or a fine-tuned model;
* :mod:`.rebuild`, :mod:`.convert`, :mod:`.assemble`, :mod:`.unfreeze`, :mod:`.run_data`,
  :mod:`.equivalence`, :mod:`.training`, :mod:`.inference`, :mod:`.export`: one step each.

The public functions are exported from :mod:`featurecache` (``featurecache.finetune``); this
package's modules are imported by their own names, so no function shadows a module.
Importing this package imports no TensorFlow.
"""

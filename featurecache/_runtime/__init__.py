"""Process infrastructure every stage shares: progress bars, library versions, quiet TensorFlow start-up.

* :mod:`.options`: options objects declared once (default, flag, help), the base of each stage's;
* :mod:`.progress`: the one progress bar (stderr, 80 columns);
* :mod:`.versions`: the library versions recorded beside features and runs;
* :mod:`.quiet_tf`: keeping TensorFlow's native start-up lines off the command line's stderr.
"""

"""What runs the models: DeepSpeed training engines (``training``), and the hybrid engine (``hybrid``) that
switches the actor to a static-shape decoder for fast generation (``decode``)."""

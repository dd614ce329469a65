"""The second stage: seeds from a stage-1 run -> a segmentation network -> masks for new images.

``seeds`` makes the training split's pseudo masks from the true image labels (with an optional
"uncertain -> ignore" band), ``model`` / ``decoder`` build the network (the stage-1 ViT's patch
tokens with an all-MLP decoder, or segmentation_models_pytorch), ``train`` trains it with the
stage-1 loop, ``evaluate`` scores it without image labels and ``predict`` runs it on any image.
"""

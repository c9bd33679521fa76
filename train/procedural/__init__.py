"""Procedurally generated training and evaluation objects for the embedded default checkpoint.

``objects`` builds random compositions of 1-3 textured primitives, seeded by (split, index);
``render`` renders one into the rendered-object folder format of the Blender pipeline;
``generate`` is the command line; ``calibrate`` sets a from-scratch MVAE's latent scale.

The default checkpoint (``models/mvdpp_default.safetensors``), from the repository root::

    python -m train.procedural.generate --out /tmp/mvdpp_default/data/train --split train --count 791 --size 64 \
        --legacy-on-white
    python -m train.procedural.generate --out /tmp/mvdpp_default/data/heldout --split heldout --count 64 \
        --legacy-on-white
    python train/train_mvae.py --config train/configs/default_mvae.yaml
    python -m train.procedural.calibrate --mvae /tmp/mvdpp_default/runs/mvae/export/mvae.safetensors \
        --data /tmp/mvdpp_default/data/train --out /tmp/mvdpp_default/mvae_calibrated.safetensors --objects 8
    python train/train_mvae.py --config train/configs/default_mvae_2.yaml
    python -m train.procedural.calibrate --mvae /tmp/mvdpp_default/runs2/mvae/export/mvae.safetensors \
        --data /tmp/mvdpp_default/data/train --out /tmp/mvdpp_default/mvae2_calibrated.safetensors --objects 8
    python train/train_mvdiff.py --config train/configs/default_unet.yaml
    python -m train.procedural.generate --out /tmp/mvdpp_default/data/train8000 --split train --count 8000 --size 64 \
        --legacy-on-white
    python train/train_mvdiff.py --config train/configs/default_unet_3.yaml
    python train/train_mvdiff.py --config train/configs/default_unet_5.yaml
    python -m train.procedural.generate --out /tmp/mvdpp_default/data/train_straight --split train --count 8000 \
        --start 8000 --size 64
    python train/train_mvae.py --config train/configs/default_mvae_4.yaml
    python -m train.procedural.calibrate --mvae /tmp/mvdpp_default/runs4/mvae/export/mvae.safetensors \
        --data /tmp/mvdpp_default/data/train_straight --out /tmp/mvdpp_default/mvae4_calibrated.safetensors
    python train/train_mvdiff.py --config train/configs/default_unet_7.yaml
    python train/train_mvdiff.py --config train/configs/default_unet_8.yaml
    cp /tmp/mvdpp_default/runs/unet8/export/model.safetensors models/mvdpp_default.safetensors
    python tests/test_default_checkpoint.py --write-reference
    python -m train.procedural.generate --out /tmp/mvdpp_default/data/heldout_straight --split heldout --count 50 \
        --size 64
    python scripts/eval_default.py --heldout /tmp/mvdpp_default/data/heldout_straight --count 50 --views 1 2 4 \
        --multi-count 16 --no-baseline --copy-count 16 --input-copy --grids /tmp/mvdpp_default/grids --out report.json

``--legacy-on-white`` renders colour composited on white, as the renderer did until 2026-12-05
and as steps 1-5 trained on; new data sets are rendered with straight alpha (``render.py``), as
steps 7 and 8 trained on.

The first UNet step is also ``scripts/train_default.py --objects 791 --max-steps 19157 --batch-size 2``
on the MVAE then shipped (the same tensors as ``mvae2_calibrated.safetensors``); that run
made 6000 steps, then resumed in the same ``--work`` folder with ``--minutes 95``. The second
(``default_unet_3.yaml``) continues its export for 10000 steps on 8000 objects with the learning
rate decayed to 0 (59 min on the 2 cores). The third (``default_unet_5.yaml``) continues that export
for 9000 steps on the same objects with the epipolar attention bias switched on, the condition
dropped from half the one-view objects and a timestep per target view (56.5-84 min on 2 cores). Then
(``default_mvae_4.yaml``) the MVAE learns 2000 more steps with a loss term on the object's own
pixels, on 8000 new straight-alpha objects, so colour survives its round trip, and the UNet
continues on its latents for 5000 steps (``default_unet_7.yaml``, 47 min) and 5000 more
(``default_unet_8.yaml``, 46 min).
"""

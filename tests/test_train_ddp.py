"""Two CPU processes on the gloo backend train together with DistributedDataParallel."""
import os

import torch

from detector.config.config import cfg_from_string, cfg_to_yaml, get_cfg
from detector.data.dataset import CocoInstanceDataset
from detector.engine.distributed import launch
from detector.engine.optim import build_lr_scheduler, build_optimizer
from detector.engine.trainer import Trainer, TrainingSampler
from detector.modeling.build import build_model, load_weights
from tests.test_dataset import make_disc_coco
from tests.test_train import CONFIG, tiny_opts

torch.set_num_threads(1)


def _ddp_worker(cfg_yaml: str, out_dir: str) -> None:
    """One rank: train (MAX_ITER 1) and save this rank's weights."""
    torch.set_num_threads(1)
    cfg = cfg_from_string(cfg_yaml)
    trainer = Trainer(cfg)
    trainer.train()
    rank = int(os.environ["RANK"])
    torch.save(trainer.model_without_ddp.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))


def test_two_gloo_processes_average_gradients(tmp_path):
    """After one step, both ranks hold identical weights, equal to one process stepping on the
    union of their batches.

    How the comparison is made exact: DDP optimises the mean over ranks of each rank's loss,
    and torchvision's R-CNN losses are means over the anchors/RoIs sampled in a batch, whose
    counts vary per image, so "the union batch" is defined as the mean of the per-image losses
    (which is what DDP with one image per rank computes). The RPN/RoI samplers draw from the
    global torch RNG, which the trainer seeds with SEED + rank once the model is built; the
    reference reseeds the same way before each image. Augmentation draws from per-sample seeds
    of the shared stream (rank r takes positions r, r + 2, ...), and GroupNorm makes the
    forward pass independent of the batch composition. Tolerance: the largest difference
    between the DDP and reference weights must be below 1e-4 of the largest weight change of
    the step (float32 all-reduce vs. local summation order), while the two ranks' gradients
    differ by far more, so unsynchronised or summed gradients would fail.
    """
    train = make_disc_coco(str(tmp_path), n_images=4, discs=4, name="train.json")
    init = tmp_path / "init.pth"
    out = tmp_path / "out"
    os.makedirs(out)
    opts = tiny_opts(train, out, "SOLVER.MAX_ITER", "1", "SOLVER.WARMUP_ITERS", "0",
                     "SOLVER.OPTIMIZER", "SGD", "SOLVER.BASE_LR", "0.02",
                     "SOLVER.CHECKPOINT_PERIOD", "0", "MODEL.DEVICE", "cpu",
                     "MODEL.WEIGHTS", str(init), "MODEL.BACKBONE.NORM", "GN")
    cfg = get_cfg(CONFIG, opts)
    ds = CocoInstanceDataset([train], cfg)
    torch.manual_seed(0)
    start = build_model(cfg, ds.classes)
    torch.save(start.state_dict(), init)

    launch(_ddp_worker, 2, (cfg_to_yaml(cfg), str(out)))
    r0 = torch.load(out / "rank0.pt", weights_only=True)
    r1 = torch.load(out / "rank1.pt", weights_only=True)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k

    # reference: one process, the union of both ranks' samples
    model = build_model(cfg, ds.classes)
    load_weights(model, str(init))
    opt = build_optimizer(cfg, model)
    build_lr_scheduler(cfg, opt)
    stream = iter(TrainingSampler(len(ds), int(cfg.SEED)))
    items = [ds[next(stream)] for _ in range(2)]
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for r, (img, t) in enumerate(items):
        torch.manual_seed(int(cfg.SEED) + r)
        model.zero_grad()
        sum(model([img], [t]).values()).backward()
        grads.append([p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params])
    for p, g0, g1 in zip(params, *grads):
        p.grad = (g0 + g1) / 2
    torch.nn.utils.clip_grad_norm_(params, float(cfg.SOLVER.CLIP_GRADIENTS.MAX_NORM))
    opt.step()

    ref = model.state_dict()
    w0 = start.state_dict()
    change = max(float((ref[k] - w0[k]).abs().max()) for k in ref if ref[k].is_floating_point())
    diff = max(float((ref[k] - r0[k]).abs().max()) for k in ref if ref[k].is_floating_point())
    spread = max(float((g0 - g1).abs().max()) for g0, g1 in zip(*grads))
    assert change > 0
    assert diff <= 1e-4 * change, (diff, change)
    assert spread * float(cfg.SOLVER.BASE_LR) > 100 * 1e-4 * change  # the test can tell

"""M2 training recipes compared on equal wall-clock time: a plain loop over ssvae_pl's M2 (the same networks and
bounds as `ssvae fit -c configs/mnist/m2.yaml`), the data on the device, validation accuracy and the accuracy of the
generative model's own choice argmax_y L(x, y) logged every other epoch. The recipe table of docs/why-m2-recipe.md comes from two
rounds of jobs run side by side on one H100 (420-440 s each), e.g.

    python scripts/m2_recipe_sweep.py --name paper --seconds 440                       # dataset weighting, alpha 0.1 N
    python scripts/m2_recipe_sweep.py --name pyro --mode pyro --binarize none --seconds 440
    python scripts/m2_recipe_sweep.py --name fast --mode batch --binarize none --alpha 50000 --lr 3e-3 --seconds 430
    python scripts/m2_recipe_sweep.py --name vae --vae_seconds 130 &                   # M1+M2: a VAE first, then
    python scripts/m2_recipe_sweep.py --name m1m2 --m1m2 --lr 1e-3 --seconds 290       # M2 on its latents

--mode: dataset | batch (model.weighting) | pyro (Pyro's schedule: unlabelled steps, a labelled step every
--sup_every steps with the classification loss times --aux, sums over the batch). Each job writes <out>/<name>.json.
"""
import argparse, json, time, sys, os
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ssvae_pl.models import M1M2, M2  # noqa: E402
from ssvae_pl.data.labelled import make_split  # noqa: E402
from ssvae_pl.data.sources import MNIST  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--name", required=True)
p.add_argument("--mode", default="dataset", choices=["dataset", "batch", "pyro"])
p.add_argument("--alpha", type=float, default=None)
p.add_argument("--bl", type=int, default=100)
p.add_argument("--bu", type=int, default=200)
p.add_argument("--binarize", default="dynamic")
p.add_argument("--z", type=int, default=50)
p.add_argument("--hidden", type=int, default=500)
p.add_argument("--lr", type=float, default=4.2e-4)
p.add_argument("--beta1", type=float, default=0.95)
p.add_argument("--aux", type=float, default=46.0)
p.add_argument("--sup_every", type=int, default=250)
p.add_argument("--seconds", type=float, default=420)
p.add_argument("--labels", type=int, default=100)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--out", default="lightning_logs/m2_recipes")
p.add_argument("--data_dir", default="data")
p.add_argument("--activation", default="softplus")
p.add_argument("--m1m2", action="store_true")
p.add_argument("--vae_seconds", type=float, default=0)
a = p.parse_args()

dev = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(a.seed)
mnist = MNIST(a.data_dir)
mnist.prepare()
xtr, ytr = mnist.load(train=True)
split = make_split(ytr, a.labels, 10, 10000, a.seed)
X = (xtr.float() / 255).to(dev)
Y = ytr.to(dev)
tr, va, lab = split.train.to(dev), split.val.to(dev), split.labelled.to(dev)
gen = torch.Generator(device="cpu").manual_seed(1)
xval = torch.bernoulli(X[va].cpu(), generator=gen).to(dev)
yval = Y[va]

vae_hparams = None
VAE_PATH = "/tmp/vae.pt"
if a.vae_seconds:
    from ssvae_pl.models.vae import VAE
    vae = VAE().to(dev)
    vopt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    t0 = time.time(); ep = 0
    while time.time() - t0 < a.vae_seconds:
        perm = tr[torch.randperm(len(tr), device=dev)]
        for s in range(len(tr) // 100):
            x = torch.bernoulli(X[perm[s * 100:(s + 1) * 100]])
            mean, std = vae.encoder(x)
            from ssvae_pl import elbo as E
            z = E.reparameterize(mean, std)
            loss = -(E.bernoulli_log_likelihood(vae.decoder(z), x) - E.kl_standard_normal(mean, std)).mean()
            vopt.zero_grad(); loss.backward(); vopt.step()
        ep += 1
        print("vae", ep, round(time.time() - t0, 1), loss.item(), flush=True)
    torch.save(vae.encoder.state_dict(), VAE_PATH + ".tmp"); os.replace(VAE_PATH + ".tmp", VAE_PATH)
    sys.exit(0)
if a.m1m2:
    while not os.path.exists(VAE_PATH):
        time.sleep(2)
    vae_hparams = dict(input_shape=[1, 28, 28], hidden_dims=[600, 600], latent_dim=50, activation="softplus",
                       min_std=1e-4)
sizes = dict(input_shape=(1, 28, 28), num_classes=10, hidden_dims=[a.hidden], classifier_hidden_dims=[a.hidden],
             latent_dim=a.z, alpha=a.alpha, weighting="batch" if a.mode == "batch" else "dataset",
             activation=a.activation)
model = (M1M2(vae_hparams=vae_hparams, **sizes) if a.m1m2 else M2(**sizes)).to(dev)
if a.m1m2:
    model.m1_encoder.load_state_dict(torch.load(VAE_PATH))
    model.m1_encoder.to(dev)
t_start = time.time()
model.set_data_sizes(a.labels, len(tr), len(tr))
opt = torch.optim.Adam([q for q in model.parameters() if q.requires_grad], lr=a.lr, betas=(a.beta1, 0.999))


def prep(x):
    if a.binarize == "dynamic":
        return torch.bernoulli(x)
    return x


@torch.no_grad()
def evaluate():
    model.eval()
    correct = gen_correct = 0
    for i in range(0, len(xval), 1000):
        x, y = xval[i:i + 1000], yval[i:i + 1000]
        h = model.features(x)
        correct += (model.classifier(h).argmax(-1) == y).sum().item()
        if i < 2000:
            gen_correct += (model.class_bounds(h).argmax(-1) == y).sum().item()
    model.train()
    return correct / len(xval), gen_correct / 2000


log = []
t0 = time.time()
epoch = 0
steps_per_epoch = len(tr) // a.bu
while time.time() - t0 < a.seconds:
    perm = tr[torch.randperm(len(tr), device=dev)]
    sums = {"lu": 0.0, "ll": 0.0, "ce": 0.0}
    for s in range(steps_per_epoch):
        xu = prep(X[perm[s * a.bu:(s + 1) * a.bu]])
        if a.mode == "pyro":
            if s % a.sup_every == 1:
                li = lab[torch.randperm(len(lab), device=dev)[:a.bl]]
                xl, yl = prep(X[li]), Y[li]
                hl = model.features(xl)
                bl = model.labelled_bound(hl, yl)
                ce = F.cross_entropy(model.classifier(hl), yl, reduction="none")
                loss = (-bl).sum() + a.aux * ce.sum()
                opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
                sums["ll"] += bl.mean().item(); sums["ce"] += ce.mean().item()
            bu = model.unlabelled_bound(model.features(xu))
            loss = (-bu).sum()
            opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
            if s % 50 == 0:
                sums["lu"] += bu.mean().item()
        else:
            li = lab[torch.randint(len(lab), (a.bl,), device=dev)] if a.bl > len(lab) else \
                lab[torch.randperm(len(lab), device=dev)[:a.bl]]
            batch = {"labelled": (prep(X[li]), Y[li]), "unlabelled": xu}
            terms = model.loss_terms(batch)
            opt.zero_grad(set_to_none=True); terms["loss"].backward(); opt.step()
            if s % 50 == 0:
                sums["lu"] += terms["elbo_unlabelled"].mean().item()
                sums["ll"] += terms["elbo_labelled"].mean().item()
                sums["ce"] += terms["classification"].mean().item()
    epoch += 1
    if epoch % 2 == 1 or time.time() - t0 >= a.seconds:
        acc, gacc = evaluate()
        rec = {"epoch": epoch, "t": round(time.time() - t0, 1), "val_acc": acc, "gen_acc": gacc,
               **{k: round(v, 3) for k, v in sums.items()}}
        log.append(rec)
        print(a.name, json.dumps(rec), flush=True)
os.makedirs(a.out, exist_ok=True)
json.dump({"args": vars(a), "log": log}, open(f"{a.out}/{a.name}.json", "w"))

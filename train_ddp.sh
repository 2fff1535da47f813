#!/usr/bin/env bash
# One launcher for every training run, from a 2-core laptop to a multi-node GPU cluster (README "Training at any scale").
#
#   bash train_ddp.sh                     # the tiny pipeline: VAE, planner, samples, evaluation -> out/tiny/
#   bash train_ddp.sh STAGE [args...]     # one stage through torchrun: vae, planner, vae-robot, planner-libero, policy
#   PRESET=paper DATA=/data/shards bash train_ddp.sh vae                 # one node, every GPU
#   PRESET=paper DATA=/data/shards srun --ntasks-per-node=1 bash train_ddp.sh vae   # SLURM: one task per node
#
# Settings: PRESET (tiny | paper), DATA (the stage's --data), OUT (out/$PRESET), NPROC_PER_NODE (GPUs, else cores),
# NNODES / NODE_RANK / MASTER_ADDR / MASTER_PORT (under SLURM: from its variables), PYTHON (.venv/bin/python if there,
# else python3), DRY_RUN=1 (print the command lines only). The pipeline passes --resume=true: run it again after a
# kill and it continues (rm -rf out/tiny starts afresh).
set -euo pipefail
cd "$(dirname "$0")"
if [[ -x .venv/bin/python ]]; then PYTHON=${PYTHON:-.venv/bin/python}; else PYTHON=${PYTHON:-python3}; fi
PRESET=${PRESET:-tiny}
DATA=${DATA:-}
OUT=${OUT:-out/$PRESET}
DRY_RUN=${DRY_RUN:-0}

if [[ -n ${SLURM_JOB_NODELIST:-} ]]; then
    NNODES=${NNODES:-${SLURM_NNODES:-1}}
    NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
    MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
    NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
    if [[ -n ${SLURM_NTASKS:-} && $SLURM_NTASKS != "$NNODES" ]]; then
        echo "train_ddp.sh: SLURM_NTASKS=$SLURM_NTASKS on $NNODES nodes: run one task per node (srun" \
             "--ntasks-per-node=1); torchrun starts the processes of each node" >&2
        exit 1
    fi
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_PORT=${MASTER_PORT:-29500}
if [[ -z ${NPROC_PER_NODE:-} ]]; then  # one process per GPU; without one, per physical core (trainer.set_threads)
    NPROC_PER_NODE=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
    [[ $NPROC_PER_NODE -gt 0 ]] || NPROC_PER_NODE=$(env -u OMP_NUM_THREADS "$PYTHON" -c \
        "import torch; print(torch.get_num_threads())" 2>/dev/null || echo 1)
fi

run() {  # print, then run (or only print with DRY_RUN=1)
    echo "+ $(printf '%q ' "$@")"
    [[ $DRY_RUN == 1 ]] || "$@"
}

stage() {  # stage NAME [args...]: torchrun the stage's script on this node
    local name=$1; shift
    local launch=(--nproc_per_node="$NPROC_PER_NODE") script=$name.py preset=$PRESET inputs=()
    if [[ $NNODES == 1 && -z ${MASTER_ADDR:-} ]]; then
        launch=(--standalone "${launch[@]}")
    else
        launch=(--nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="${MASTER_ADDR:?set MASTER_ADDR}"
                --master_port="$MASTER_PORT" "${launch[@]}")
    fi
    case $name in
        vae) ;;
        planner) inputs=(--vae="$OUT/vae/ckpt.pt") ;;
        vae-robot)  # CPU-scale: the tiny VAE of the robot demos' tracks (at paper scale the one open-domain VAE)
            [[ $PRESET == tiny ]] || { echo "train_ddp.sh: vae-robot is tiny's; PRESET=$PRESET plans LIBERO in" \
                                            "its general VAE ($OUT/vae)" >&2; exit 2; }
            script=vae.py preset=tiny_robot ;;
        planner-libero)  # Sec. A
            script=planner.py preset=libero_tiny inputs=(--vae="$OUT/vae-robot/ckpt.pt")
            [[ $PRESET == tiny ]] || preset=libero inputs=(--vae="$OUT/vae/ckpt.pt") ;;
        policy) inputs=(--planner="$OUT/planner-libero/ckpt.pt") ;;
        *) echo "train_ddp.sh: unknown stage '$name' (vae, planner, vae-robot, planner-libero, policy;" \
                "none = the pipeline)" >&2
           exit 2 ;;
    esac
    [[ -z $DATA ]] || inputs+=(--data="$DATA")
    run "$PYTHON" -m torch.distributed.run "${launch[@]}" "$script" --preset="$preset" --out_dir="$OUT/$name" \
        "${inputs[@]}" "$@"
}

pipeline() {  # the README's main job on the embedded synthetic data: everything under $OUT
    local t0=$SECONDS models=(--vae "$OUT/vae/ckpt.pt" --planner "$OUT/planner/ckpt.pt")
    stage vae --resume=true
    stage planner --resume=true
    run "$PYTHON" sample.py "${models[@]}" --out "$OUT/samples"
    run "$PYTHON" sample.py "${models[@]}" --out "$OUT/samples/text" --text "the red square moves to the right"
    run "$PYTHON" eval.py recon --vae "$OUT/vae/ckpt.pt" --json "$OUT/eval/recon.json"
    run "$PYTHON" eval.py tracks "${models[@]}" --pokes 0,1,4,16 --json "$OUT/eval/tracks.json"
    run "$PYTHON" eval.py tracks "${models[@]}" --pokes 0 --text --json "$OUT/eval/tracks_text.json"
    echo "=== pipeline done in $(((SECONDS - t0) / 60)) min $(((SECONDS - t0) % 60)) s: checkpoints, logs and val.png in" \
         "$OUT/vae and $OUT/planner, pictures in $OUT/samples, metrics in $OUT/eval ==="
}

if [[ $# -eq 0 ]]; then pipeline; else stage "$@"; fi

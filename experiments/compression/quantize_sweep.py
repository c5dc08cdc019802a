"""int8 quantization of the MNIST CNN: post-training (PTQ) against quantization-aware (QAT), 3 seeds.

  bigjax-sweep --sweep=experiments/compression/quantize_sweep.py --workdir=runs/compression/quantize

configs/mnist_cnn.py (620 steps of Adam 1e-3) with every conv and dense layer in int8 (Qwix):
per-channel symmetric int8 weights, int8 activations. ptq: trained in float ('accuracy' is the
float model's, the dense baseline of the pruning study too), then activations calibrated on 4
training batches (static absmax scales) and evaluated as int8 ('quant_accuracy'). qat: trained
with fake quantization (straight-through gradients, dynamic activation scales); 'accuracy' is the
fake-quantized eval, 'quant_accuracy' the converted int8 model's. Bytes: parameters in float32
against int8 weights + float32 scales and biases. *_ms: median time of one jitted eval batch of
512 on this CPU, float against int8 (XLA:CPU: s8 x s8 -> s32 dots; convolutions on s8 values
widened to s32).
"""

from bigjax import sweep


def get_sweep():
  return sweep.Sweep(
    config='mnist_cnn',
    overrides={'log_every': 31, 'checkpoint_every': 310},
    settings=sweep.axis('quantize.mode', ['ptq', 'qat'], label='mode'),
    seeds=[0, 1, 2],
    metrics=[
      'accuracy',
      'quant_accuracy',
      'loss',
      'quant_loss',
      'float_bytes',
      'quant_bytes',
      'float_ms',
      'quant_ms',
    ],
    derived={
      'drop': lambda m: m['accuracy'] - m['quant_accuracy'],
      'size_ratio': lambda m: m['float_bytes'] / m['quant_bytes'],
      'speedup': lambda m: m['float_ms'] / m['quant_ms'],
    },
  )

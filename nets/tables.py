"""The thesis' layer tables, transcribed as data (built by :func:`nets.build.build`).

Each table is a dict:

``name``, ``source``   registry name and the thesis table it transcribes;
``input``              the input size the table's ``output`` column refers to;
``columns``            names of the row fields, in the order of the thesis columns;
``rows``               one tuple per thesis row (short tuples are padded with ``None``);
``conv_act``           True when the thesis table leaves "followed by an activation" implicit
                       (Tables 4.4, 4.6, 5.1, 6.1, 6.2); False when activations are rows of
                       their own (Tables 4.1-4.3);
``conv_pad``           ``"same"`` (pad ``(k-1)//2``, so a stride-s layer gives ``ceil(n/s)``)
                       or ``"valid"`` (pad 0); a kernel written ``"11x11 pad 0"`` overrides it;
``pool_pad``           same choice for pooling layers; ``pool_convention`` is MXNet's
                       ``"valid"`` (floor) or ``"full"`` (ceil, as Caffe/cxxnet round).

Row vocabulary: ``convolution``, ``max pool[ing]``, ``avg pool`` / ``avg/max pooling``
(the final pooling, always made global so any input size works, its mode set by the
``pool`` option), ``module-N`` (TinyNet: 1x1 path + 3x3 path, or with ``stride 2``: stride-2
3x3 path + 3x3/2 max-pool path, concatenated), ``inception (..)`` (Table 4.4 columns),
``fully connected``, ``activation``, ``lrn``, ``dropout``, and the classifier row
``softmax`` / ``linear classifier``. An optional ``groups`` column gives grouped
convolutions. A cell holding a dict is chosen by the ``variant`` option (TinyNet A/B,
AlexNet grouped/single).

Where a table is internally inconsistent or incomplete the fix is in a comment on the row.
"""
from __future__ import annotations

# Table 6.1: NDSB Network-1 (128x128 grey input). Every convolution is followed by an
# activation (RReLU in the competition).
NDSB_NET1 = {
    "name": "ndsb_net1",
    "source": "Table 6.1: NDSB Network-1",
    "input": 128,
    "columns": ("type", "kernel/stride", "output"),
    "conv_act": True, "conv_pad": "same", "pool_pad": "same", "pool_convention": "valid",
    "rows": [
        ("convolution", "5x5/1", "128x128x16"),
        ("max pooling", "3x3/2", "64x64x16"),
        ("convolution", "3x3/1", "64x64x32"),
        ("convolution", "3x3/1", "64x64x32"),
        ("convolution", "3x3/1", "64x64x64"),
        ("convolution", "3x3/1", "64x64x64"),
        ("convolution", "3x3/1", "64x64x128"),
        ("max pooling", "3x3/2", "32x32x128"),
        ("convolution", "3x3/1", "32x32x256"),
        ("max pooling", "3x3/2", "16x16x256"),
        ("convolution", "3x3/1", "16x16x512"),
        ("max pooling", "3x3/2", "8x8x512"),
        ("convolution", "3x3/1", "8x8x512"),
        ("convolution", "3x3/1", "8x8x512"),
        ("avg/max pooling", "8x8/1", "1x1x512"),
        ("softmax", None, "1x1x121"),
    ],
}

# Table 6.2: NDSB Network-2 (144x144 input): one more 512 convolution at 18x18 and a 3x3/3
# pooling (18 -> 6) instead of 3x3/2.
NDSB_NET2 = {
    "name": "ndsb_net2",
    "source": "Table 6.2: NDSB Network-2",
    "input": 144,
    "columns": ("type", "kernel/stride", "output"),
    "conv_act": True, "conv_pad": "same", "pool_pad": "same", "pool_convention": "valid",
    "rows": [
        ("convolution", "5x5/1", "144x144x16"),
        ("max pooling", "3x3/2", "72x72x16"),
        ("convolution", "3x3/1", "72x72x32"),
        ("convolution", "3x3/1", "72x72x32"),
        ("convolution", "3x3/1", "72x72x64"),
        ("convolution", "3x3/1", "72x72x64"),
        ("convolution", "3x3/1", "72x72x128"),
        ("max pooling", "3x3/2", "36x36x128"),
        ("convolution", "3x3/1", "36x36x256"),
        ("max pooling", "3x3/2", "18x18x256"),
        ("convolution", "3x3/1", "18x18x512"),
        ("convolution", "3x3/1", "18x18x512"),
        ("max pooling", "3x3/3", "6x6x512"),
        ("convolution", "3x3/1", "6x6x512"),
        ("convolution", "3x3/1", "6x6x512"),
        ("avg/max pooling", "6x6/1", "1x1x512"),
        ("softmax", None, "1x1x121"),
    ],
}

# Table 4.6: Tiny ImageNet network. The output column (56x56 after the first layer) fixes the
# input at 112 px for A (7x7/2) and 224 px for B (9x9/4): the crops of the 128 and 256 px
# images the text mentions. Module output = 1x1 + 3x3 filters; a stride-2 module's output
# = 3x3 filters + its input channels (the max-pool path has no projection).
TINYNET = {
    "name": "tinynet",
    "source": "Table 4.6: Tiny ImageNet structure",
    "input": {"A": 112, "B": 224},
    "columns": ("type", "kernel/stride", "output", "1x1", "3x3", "pool"),
    "conv_act": True, "conv_pad": "same", "pool_pad": "same", "pool_convention": "valid",
    "rows": [
        ("convolution", {"A": "7x7/2", "B": "9x9/4"}, "56x56x64"),
        ("max pool", "3x3/2", "28x28x64"),
        ("convolution", "3x3/1", "28x28x96"),
        ("module-1", "", "28x28x64", 32, 32),
        ("module-2", "", "28x28x80", 32, 48),
        ("module-3", "stride 2", "14x14x160", None, 80, "max"),
        ("module-4", "", "14x14x160", 112, 48),
        ("module-5", "", "14x14x160", 96, 64),
        ("module-6", "", "14x14x160", 80, 80),
        ("module-7", "", "14x14x144", 48, 96),
        ("module-8", "stride 2", "7x7x240", None, 96, "max"),
        ("module-9", "", "7x7x336", 176, 160),
        ("module-10", "", "7x7x336", 176, 160),
        ("avg pool", "7x7/1", "1x1x336"),
        ("softmax", None, "1x1x1000"),  # implicit in the thesis table (ImageNet classes)
    ],
}

# Table 5.1: Tiny CIFAR-10 structure = Table 4.6 without its first convolution and pooling,
# for 28x28 crops. The thesis prints the first row as output "28x28x64" with 96 in the 3x3
# column; Table 4.6 has 28x28x96 for the same layer, so 96 filters it is.
TINYNET_CIFAR = {
    "name": "tinynet_cifar",
    "source": "Table 5.1: Tiny CIFAR-10 structure",
    "input": 28,
    "columns": ("type", "kernel/stride", "output", "1x1", "3x3", "pool"),
    "conv_act": True, "conv_pad": "same", "pool_pad": "same", "pool_convention": "valid",
    "rows": [
        ("convolution", "3x3/1", "28x28x96"),
        ("module-1", "", "28x28x64", 32, 32),
        ("module-2", "", "28x28x80", 32, 48),
        ("module-3", "stride 2", "14x14x160", None, 80, "max"),
        ("module-4", "", "14x14x160", 112, 48),
        ("module-5", "", "14x14x160", 96, 64),
        ("module-6", "", "14x14x160", 80, 80),
        ("module-7", "", "14x14x144", 48, 96),
        ("module-8", "stride 2", "7x7x240", None, 96, "max"),
        ("module-9", "", "7x7x336", 176, 160),
        ("module-10", "", "7x7x336", 176, 160),
        ("avg pool", "7x7/1", "1x1x336"),
        ("softmax", None, "1x1x10"),  # implicit in the thesis table (CIFAR-10 classes)
    ],
}

# Table 4.4: Inception-BN. A "convolution" row with a "#3x3 reduce" entry is a 1x1 reduction
# followed by the 3x3 convolution (the 2015 GoogLeNet stem). In a stride-2 module the last
# 3x3 of each 3x3 path has stride 2 and the pool path is a 3x3/2 max pool without projection.
# Output channels: 3a 256, 3b 320, 3c 576, 4a-4b 576, 4c-4d 608, 4e 1056, 5a-5b 1024.
INCEPTION_BN = {
    "name": "inception_bn",
    "source": "Table 4.4: Inception Network Structure Surpass Human Vision",
    "input": 224,
    "columns": ("type", "kernel/stride", "1x1", "3x3 reduce", "3x3", "double 3x3 reduce",
                "double 3x3", "pool"),
    "conv_act": True, "conv_pad": "same", "pool_pad": "same", "pool_convention": "valid",
    "rows": [
        ("convolution", "7x7/2", None, None, 64),
        ("max pool", "3x3/2"),
        ("convolution", "3x3/1", None, 64, 192),
        ("max pool", "3x3/2"),
        ("inception (3a)", "", 64, 64, 64, 64, 96, "avg + 32"),
        ("inception (3b)", "", 64, 64, 96, 64, 96, "avg + 64"),
        ("inception (3c)", "stride 2", 0, 128, 160, 64, 96, "max"),
        ("inception (4a)", "", 224, 64, 96, 96, 128, "avg + 128"),
        ("inception (4b)", "", 192, 96, 128, 96, 128, "avg + 128"),
        ("inception (4c)", "", 160, 128, 160, 128, 160, "avg + 128"),
        ("inception (4d)", "", 96, 128, 192, 160, 192, "avg + 128"),
        ("inception (4e)", "stride 2", 0, 128, 192, 192, 256, "max"),
        ("inception (5a)", "", 352, 192, 320, 160, 224, "avg + 128"),
        ("inception (5b)", "", 352, 192, 320, 192, 224, "max + 128"),
        ("avg pool", "7x7/1"),
        ("softmax",),  # implicit in the thesis table
    ],
}

# Table 4.1: LeNet-5 as printed: activation *after* pooling, valid (unpadded) convolutions.
LENET = {
    "name": "lenet",
    "source": "Table 4.1: LeNet and Maxout MNIST Net",
    "input": 28,
    "columns": ("type", "filters", "kernel", "stride"),
    "conv_act": False, "conv_pad": "valid", "pool_pad": "valid", "pool_convention": "valid",
    "rows": [
        ("convolution", 20, "5x5", 1),
        ("max pooling", None, "2x2", 2),
        ("activation",),  # tanh in the thesis; the activation is an option of every net
        ("convolution", 50, "5x5", 1),
        ("max pooling", None, "2x2", 2),
        ("activation",),
        ("fully connected", 500),
        # The table has no activation here; without one the 500-unit layer and the
        # classifier collapse into a single linear map (Caffe's LeNet has a ReLU here).
        ("activation",),
        ("linear classifier",),
    ],
}

# Table 4.2: AlexNet. Convolutions 2-5 are padded to keep their size, the first is not, and
# pooling rounds up (Caffe), which gives 227 -> 55 -> 27 -> 13 -> 6. The "groups" column is
# not in the printed table: the original net [34] split convolutions 2, 4 and 5 over two GPUs
# (variant "grouped", 61.0M parameters, 0.72 G multiply-adds: the 60M and the 1X of
# Table 4.7); variant "single" is the ungrouped net the text says is used now (62.4M).
ALEXNET = {
    "name": "alexnet",
    "source": "Table 4.2: AlexNet structure",
    "input": 227,
    "columns": ("type", "filters", "kernel", "stride", "groups"),
    "conv_act": False, "conv_pad": "same", "pool_pad": "valid", "pool_convention": "full",
    "rows": [
        ("convolution", 96, "11x11 pad 0", 4),
        ("max pooling", None, "3x3", 2),
        ("activation",),
        ("lrn",),
        ("convolution", 256, "5x5", 1, {"grouped": 2, "single": 1}),
        ("max pooling", None, "3x3", 2),
        ("activation",),
        ("lrn",),
        ("convolution", 384, "3x3", 1),
        ("activation",),
        ("convolution", 384, "3x3", 1, {"grouped": 2, "single": 1}),
        ("activation",),
        ("convolution", 256, "3x3", 1, {"grouped": 2, "single": 1}),
        ("activation",),
        # Missing from the printed table but stated in the text ("3 max pooling layers");
        # without it the first FC layer alone would have 177M weights instead of 38M.
        ("max pooling", None, "3x3", 2),
        ("fully connected", 4096),
        ("activation",),
        ("dropout",),
        ("fully connected", 4096),
        ("activation",),
        ("dropout",),
        ("linear classifier",),
    ],
}


def _vgg(name: str, source: str, convs_per_block: tuple[int, ...]) -> dict:
    """A Table 4.3 style VGG: blocks of 3x3 convolutions (64, 128, 256, 512, 512 filters),
    each followed by a 2x2/2 max pooling, then two 4096-unit layers and the classifier."""
    rows: list[tuple] = []
    for filters, convs in zip((64, 128, 256, 512, 512), convs_per_block):
        rows += [("convolution", filters, "3x3", 1), ("activation",)] * convs
        rows.append(("max pooling", None, "2x2", 2))
    rows += [("fully connected", 4096), ("activation",), ("dropout",)] * 2
    rows.append(("linear classifier",))
    return {
        "name": name,
        "source": source,
        "input": 224,
        "columns": ("type", "filters", "kernel", "stride"),
        "conv_act": False, "conv_pad": "same", "pool_pad": "valid", "pool_convention": "valid",
        "rows": rows,
    }


# Table 4.3: VGG-E (19 weight layers): 2, 2, 4, 4, 4 convolutions per block.
VGG19 = _vgg("vgg19", "Table 4.3: VGG-E Network", (2, 2, 4, 4, 4))

# The 16-layer VGG-D of Table 4.7 (138M parameters) in the style of Table 4.3: three instead
# of four convolutions in each of the last three blocks.
VGG16 = _vgg("vgg16", "Table 4.3 style, VGG-D (VGG-16 of Table 4.7)", (2, 2, 3, 3, 3))

TABLES = {t["name"]: t for t in (NDSB_NET1, NDSB_NET2, TINYNET, TINYNET_CIFAR, INCEPTION_BN,
                                 LENET, ALEXNET, VGG16, VGG19)}

import numpy as np

from studies.faces_descriptor import with_min_images


def test_with_min_images_compares_label_values_not_positions() -> None:
    # ORL's labels are person numbers 1..40: every person must be kept (the old code compared
    # the labels with positions 0..39 and silently dropped person 40)
    orl = np.repeat(np.arange(1, 41), 10)
    assert with_min_images(orl, 4).all()
    # sparse labels: 7 (3 images) kept, 2 and 9 (1 and 2 images) dropped
    labels = np.array([7, 2, 7, 9, 7, 9])
    assert with_min_images(labels, 3).tolist() == [True, False, True, False, True, False]
    assert with_min_images(labels, 2).tolist() == [True, False, True, True, True, True]

import numpy as np

from studies.faces_descriptor import study_descriptors, with_min_images


def test_with_min_images_compares_label_values_not_positions() -> None:
    # ORL's labels are person numbers 1..40: every person must be kept (the old code compared
    # the labels with positions 0..39 and silently dropped person 40)
    orl = np.repeat(np.arange(1, 41), 10)
    assert with_min_images(orl, 4).all()
    # sparse labels: 7 (3 images) kept, 2 and 9 (1 and 2 images) dropped
    labels = np.array([7, 2, 7, 9, 7, 9])
    assert with_min_images(labels, 3).tolist() == [True, False, True, False, True, False]
    assert with_min_images(labels, 2).tolist() == [True, False, True, True, True, True]


def test_study_descriptors_do_not_depend_on_the_cache_order() -> None:
    from training.face_cache import Descriptors

    names = ["b/b_0001.jpg", "a/a_0002.jpg", "a/a_0001.jpg", "c/c_0001.jpg"]
    vecs = np.arange(8, dtype=np.float32).reshape(4, 2)
    one = Descriptors(names, vecs, np.zeros((4, 4), np.int32), np.ones(4, bool))
    order = [2, 0, 3, 1]
    two = Descriptors(
        [names[i] for i in order], vecs[order], np.zeros((4, 4), np.int32), np.ones(4, bool)
    )
    study = {"a/a_0001.jpg", "a/a_0002.jpg", "b/b_0001.jpg"}
    got = [study_descriptors(d, study) for d in (one, two)]
    assert got[0].names == got[1].names == ["a/a_0001.jpg", "a/a_0002.jpg", "b/b_0001.jpg"]
    assert np.array_equal(got[0].vectors, got[1].vectors)
    assert got[0].vectors[:, 0].tolist() == [4.0, 2.0, 0.0]

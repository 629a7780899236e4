"""The offline natural photos and their deterministic views (lowacc.data.photo_views), checked
against crops and resizes made here with PIL directly. They skip without the wheels."""

import numpy as np
import pytest
from PIL import Image

from lowacc.data import imagenet_samples, photo_views
from lowacc.data.imagenet_samples import square_view


@pytest.fixture(scope='module')
def views():
  try:
    return photo_views.photo_views()
  except FileNotFoundError as e:
    pytest.skip(str(e))


def test_the_photos():
  try:
    photos = photo_views.natural_photos()
  except FileNotFoundError as e:
    pytest.skip(str(e))
  names = photos.columns['name']
  assert len(photos) == 27 and len(set(names)) == 27
  assert names[20:] == ['astronaut', 'coffee', 'chelsea', 'rocket', 'motorcycle_left',
                        'motorcycle_right', 'grace_hopper']
  labels = photos.columns['label']
  np.testing.assert_array_equal(labels[:20], imagenet_samples.imagenet_samples().columns['label'])
  assert (labels[20:] == photo_views.NO_LABEL).all()
  for i in range(len(photos)):
    image = photos[i]['image']
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert min(image.shape[:2]) >= 300 and image.std() > 10, names[i]
  assert photos[21]['image'].shape == (400, 600, 3)  # coffee


def test_views_are_distinct_view_major_and_inside_their_photo(views):
  assert len(views) == 27 * 72 == 1944
  c = views.columns
  np.testing.assert_array_equal(c['photo'], np.tile(np.arange(27), 72))
  np.testing.assert_array_equal(c['view'], np.repeat(np.arange(72), 27))
  boxes = set()
  for i in range(len(views)):
    height, width = c['image'][i].shape[:2]
    top, left, side = int(c['top'][i]), int(c['left'][i]), int(c['side'][i])
    assert 0 <= top <= height - side and 0 <= left <= width - side and side >= 150
    boxes.add((int(c['photo'][i]), top, left, side, bool(c['flip'][i])))
  assert len(boxes) == len(views)
  # the four sizes: 224/256, 3/4, 5/8 and 1/2 of coffee's short side (400)
  assert sorted({int(s) for s, p in zip(c['side'], c['photo']) if p == 21}) == [200, 250, 300, 350]


def test_the_first_view_is_the_lite_eval_crop(views):
  for i in (0, 10, 21):  # a 512 x 512 photo, a 683 x 1024 one, coffee
    element = views[i]
    assert element['view'] == 0 and not element['flip']
    got = photo_views.ViewTransform().map(element)
    np.testing.assert_array_equal(got['image'], imagenet_samples.preprocess(element['image']))
    assert got['label'] == element['label'] and got['photo'] == i


def test_a_view_is_its_square_resized_and_mirrored(views):
  """The view against PIL's crop and resize, done here; its mirror is the mirrored view."""
  i = next(i for i in range(len(views)) if views[i]['flip'] and views[i]['top'] > 0
           and views[i]['left'] > 0 and views[i]['side'] < min(views[i]['image'].shape[:2]))
  e = views[i]
  top, left, side = int(e['top']), int(e['left']), int(e['side'])
  box = Image.fromarray(e['image']).crop((left, top, left + side, top + side))
  expected = (np.asarray(box.resize((224, 224), Image.BICUBIC), np.float32) - 127) / 128
  got = photo_views.ViewTransform().map(e)['image']
  np.testing.assert_array_equal(got, expected[:, ::-1])


def test_square_view_crops_exactly_its_window():
  """Only the window is bright: a pixel of the dark frame kept, or one of the window lost, shows."""
  image = np.zeros((90, 120, 3), np.uint8)
  image[10:70, 30:90] = 255
  np.testing.assert_array_equal(square_view(image, 10, 30, 60, 32), 1)
  image[69, 30] = 0  # the window's last row and first column are kept
  assert square_view(image, 10, 30, 60, 32).min() < 1
  assert square_view(image, 10, 30, 60, 32, flip=True)[-1, -1].min() < 1


def test_a_square_outside_the_image_raises():
  with pytest.raises(ValueError, match=r'the square top=40, left=0, side=60 is not inside the '
                                       r'90 x 120 image'):
    square_view(np.zeros((90, 120, 3), np.uint8), 40, 0, 60, 32)

"""The Keras counterparts of our models, for the benchmarks that time both."""


def seed_cnn(keras, input_shape: tuple[int, ...], num_classes: int):
  """The Keras seed model (shared/REFERENCE.md's layer table)."""
  layers = keras.layers
  return keras.Sequential([
      keras.Input(input_shape),
      layers.Rescaling(1 / 255),
      layers.Conv2D(32, 3, activation='relu'),
      layers.Conv2D(32, 3, activation='relu'),
      layers.MaxPooling2D(),
      layers.Conv2D(64, 3, activation='relu'),
      layers.BatchNormalization(),
      layers.MaxPooling2D(),
      layers.Conv2D(128, 3, activation='relu'),
      layers.BatchNormalization(),
      layers.MaxPooling2D(),
      layers.Flatten(),
      layers.Dense(512, activation='relu'),
      layers.Dropout(0.5),
      layers.Dense(num_classes),
  ])


# Our model name -> its Keras counterpart (keras, input shape, classes) -> keras.Model.
# keras.applications' ResNet50 is v1 (stride in the first 1x1 convolution of a
# block, ours in the 3x3 as torchvision's): the same layers and parameter count.
MODELS = {
    'seed_cnn': seed_cnn,
    'resnet50': lambda keras, shape, n: keras.applications.ResNet50(
        weights=None, input_shape=shape, classes=n, classifier_activation=None),
    'efficientnet_b0': lambda keras, shape, n: keras.applications.EfficientNetB0(
        weights=None, input_shape=shape, classes=n, classifier_activation=None),
}

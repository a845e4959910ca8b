# Generates the CMYK JPEG and animated PNG fixtures of tests/hostile.rs from Fashion-MNIST
# test images 0 and 1 (Pillow 13).
import gzip, sys
from PIL import Image
raw = gzip.open('/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz').read()[16:]
frames = [Image.frombytes('L', (28, 28), raw[i*784:(i+1)*784]) for i in range(2)]
out = sys.argv[1]
frames[0].convert('CMYK').save(f'{out}/cmyk.jpg', quality=100)
frames[0].save(f'{out}/animated.png', save_all=True, append_images=[frames[1]], duration=100, loop=0)

# expect: python.network
from urllib.request import urlopen
urlopen('http://example.invalid/').read()

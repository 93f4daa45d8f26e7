# expect: python.network
import httpx
httpx.get('http://example.invalid/')

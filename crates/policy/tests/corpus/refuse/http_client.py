# expect: python.network
import http.client
c = http.client.HTTPConnection('example.invalid')

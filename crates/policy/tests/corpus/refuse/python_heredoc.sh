# expect: python.native
python3 <<'EOF'
import ctypes
ctypes.CDLL(None)
EOF

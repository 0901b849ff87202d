set -x
python experiments/explore.py implicit_d01_100_50 '{"solver": "implicit", "steps": 100000, "max_seconds": 150, "damping": 0.1}'
python experiments/explore.py implicit_d01_5_5 '{"solver": "implicit", "steps": 100000, "max_seconds": 150, "damping": 0.1, "inner_steps": 5, "cg_steps": 5}'
python experiments/explore.py implicit_d1_3_3 '{"solver": "implicit", "steps": 100000, "max_seconds": 150, "damping": 1.0, "inner_steps": 3, "cg_steps": 3}'
python experiments/explore.py implicit_d0001_100_50 '{"solver": "implicit", "steps": 100000, "max_seconds": 150}'

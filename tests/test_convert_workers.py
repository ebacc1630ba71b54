"""Converting with worker processes in a process where torch has already run (a notebook that
trained, the demo): the pool then starts its workers from a clean forkserver, because forking
after OpenMP threads ran can deadlock the children (seen once in the demo's tests; not
reproducible on demand, so this test checks that the forkserver start method is the one used,
and that it converts correctly)."""
import subprocess
import sys
import textwrap


def test_conversion_with_workers_after_torch_ran(tmp_path):
    code = textwrap.dedent(f"""
        import numpy as np, torch
        from PIL import Image
        torch.set_num_threads(2)
        # run torch's OpenMP thread pool as training does (convolution, backward)
        w = torch.randn(16, 3, 3, 3, requires_grad=True)
        for _ in range(3):
            torch.nn.functional.conv2d(torch.randn(4, 3, 128, 128), w).sum().backward()
        root = {str(tmp_path)!r}
        import os
        for k in range(6):
            d = os.path.join(root, f"img{{k}}")
            os.makedirs(os.path.join(d, "images")); os.makedirs(os.path.join(d, "masks"))
            Image.fromarray(np.full((32, 32, 3), 40 * k, np.uint8)).save(os.path.join(d, "images", f"img{{k}}.png"))
            m = np.zeros((32, 32), np.uint8); m[4:12, 4:12] = 255
            Image.fromarray(m).save(os.path.join(d, "masks", "a.png"))
        import multiprocessing
        used = []
        get_context = multiprocessing.get_context
        multiprocessing.get_context = lambda method=None: (used.append(method),
                                                           get_context(method))[1]
        from detector.data.converters.dsb import convert_dsb
        conv = convert_dsb(root, workers=2, progress=False)
        print("start methods", used)
        print(len(conv.coco["images"]), len(conv.coco["annotations"]))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "start methods ['forkserver']" in r.stdout, r.stdout
    assert r.stdout.split()[-2:] == ["6", "6"]

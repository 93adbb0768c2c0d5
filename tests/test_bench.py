"""bench.py's helpers that run without a GPU: the caller table of --profile, the compile timers."""
import torch
from torch.profiler import ProfilerActivity

import bench


def test_copy_callers_names_each_copy_by_its_parent_ops():
    x = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    with torch.profiler.profile(activities=[ProfilerActivity.CPU]) as prof:
        x.contiguous()  # a layout conversion: aten::copy_ under aten::clone under aten::contiguous
        x.to(torch.bfloat16)  # a cast: aten::copy_ under aten::_to_copy under aten::to
        x.to(torch.bfloat16)
    lines = bench.copy_callers(prof).splitlines()
    assert len(lines) == 2
    assert any(line.split('calls')[1].strip() == 'aten::clone <- aten::contiguous'
               and ' 1 calls' in line for line in lines)
    assert any(line.split('calls')[1].strip() == 'aten::_to_copy <- aten::to'
               and ' 2 calls' in line for line in lines)
    # with_stack: the Python frame that made the copy, here this test
    with torch.profiler.profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
        x.contiguous()
    (line,) = bench.copy_callers(prof).splitlines()
    assert line.split('calls')[1].split('@')[0].strip() == 'aten::clone <- aten::contiguous'
    assert 'test_bench.py' in line.split('@')[1]
    with torch.profiler.profile(activities=[ProfilerActivity.CPU]) as prof:
        x.sum()
    assert 'no aten::copy_' in bench.copy_callers(prof)


def test_compile_phases_reads_dynamo_timers():
    """compile_phases reads Dynamo's timers by name: a renamed timer would read 0 seconds, silently.
    One compilation (aot_eager: Dynamo and AOTAutograd, no Inductor) must show as one graph with
    forward time."""
    torch._dynamo.reset()
    before = bench.compile_phases()
    f = torch.compile(lambda x: (x.sin() * 2).sum(), backend='aot_eager')
    f(torch.randn(8, requires_grad=True)).backward()
    after = bench.compile_phases()
    assert after['graphs'] - before['graphs'] == 1
    assert after['forward'] > before['forward']
    assert set(after) == {'forward', 'backward', 'codegen', 'kernel_wait', 'load', 'graphs'}

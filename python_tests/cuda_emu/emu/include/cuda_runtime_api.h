// cuda_emu: the CUDA runtime calls the launchers make, answered by the emulated device.
#pragma once

#include "cuda_emu.h"
#include "cuda_runtime.h"


"""Dense surfel mapping on the CPU: the ROS-free core, dataset readers and the ROS 2 node.

The core modules (camera, depth, superpixels, fusion, mapper, ...) import without
rclpy; only :mod:`surfel_mapping_node.node` and its helpers need ROS 2.
"""

import os

# The superpixel and surfel kernels run on numba's OpenMP threads. By default OpenMP
# threads spin while they wait at a barrier, and when another process (a SLAM system,
# a camera driver) holds one of the cores, a frame then takes several times longer
# (measured on 2 cores with one busy: 7 ms alone, 55-90 ms spinning, 18 ms passive).
# Setting it here, before the first kernel starts the thread pool, keeps the faster
# default for robots; an OMP_WAIT_POLICY set by the user wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
